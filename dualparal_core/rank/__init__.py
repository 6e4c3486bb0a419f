"""The one rank program (:mod:`.program`), rank 0's relay and fault monitor (:mod:`.lead`), a rank's Block Decode
(:mod:`.decode`) and its tie to its parent (:mod:`.life`)."""
