"""Data filtering networks (Fang et al. 2023) in DataComp's conventions (Gadre et al. 2023): score every pair of an
image-text pool with a CLIP model (:mod:`.score`), select by rules into a uid file (:mod:`.select`, :mod:`.uids`),
and copy the kept samples into new shards without re-encoding them (:mod:`.reshard`)."""
