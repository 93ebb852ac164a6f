"""Weight operations: the mechanism layer. Policy lives in ``policy``, sequencing in ``manager``."""
