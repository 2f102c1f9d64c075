"""What a facility does with the embeddings of its archive: similar-image search (:mod:`.index`),
which images to label next (:mod:`.suggest`) and a 2-D map of a folder (:mod:`.datamap`)."""
