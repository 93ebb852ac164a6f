"""Weight operations: the mechanism layer. Policy lives in ``policy``, plans in ``modes``, their
execution in ``executor``."""
