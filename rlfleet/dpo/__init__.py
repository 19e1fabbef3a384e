"""Direct preference optimisation with BEMA reference updates: data, learner, actor and the ``rlfleet dpo`` job."""
