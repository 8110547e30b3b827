"""Training: the loop (:mod:`.loop`), its builders (:mod:`.optim`, :mod:`.distributed`), checkpoints
(:mod:`.checkpoint`) and run logging (:mod:`.logger`)."""
