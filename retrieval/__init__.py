"""Dense, lexical and hybrid search over the index, with filters and access control."""
