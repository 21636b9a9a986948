"""hbpc's benchmark suite: curvature cost against BackPACK, curvlinops and torch.func (``make bench``)."""
