"""The parent side of a worker group: launching a local one (:mod:`.launch`), the one session with rank 0 that runs
every op (:mod:`.session`), and Block Decode's parent half (:mod:`.decode`)."""
