"""Folder jobs without a server or through one: ``predict``, ``client`` and ``watch``
(:mod:`.pipelines`), what they write (:mod:`.outputs`, :mod:`.report`) and the merge of sharded runs
(:mod:`.shards`)."""
