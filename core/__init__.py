"""What every layer shares and that depends on nothing else in facecorpus: error types and
the rejected-sample record (``errors``), atomic writes (``atomic``), content hashing
(``hashing``)."""
