"""Data pipeline: tokenizer, ``prepare-data``, shard formats, the global-position loader, the embedded corpus.

* :mod:`~hf_gpt2_train.data.tokenizer`: tiktoken ``gpt2`` built from the bundled vocabulary (or ``--tokenizer_file``), ``EOT``,
  ``vocab_hash``.
* :mod:`~hf_gpt2_train.data.prepare`: ``hf-gpt2-train prepare-data`` (documents -> uint16 shards +
  manifest, resumable).
* :mod:`~hf_gpt2_train.data.shard_writer`: the stream cut into shards (size, checksum, start of each), repair.
* :mod:`~hf_gpt2_train.data.sources`: embedded / local files / HF dataset documents.
* :mod:`~hf_gpt2_train.data.shards`: our shards, build-nanogpt ``.npy`` and llm.c ``.bin``, memory-mapped; each
  checked against its manifest entry or header.
* :mod:`~hf_gpt2_train.data.verify`: checksums at the start of a run, the data identity a resume checks,
  ``hf-gpt2-train data verify``.
* :mod:`~hf_gpt2_train.data.loader`: ``resolve_data_dir``, ``TrainLoader``, ``val_batches``.
* :mod:`~hf_gpt2_train.data.embedded`: Python's help topics as a ready corpus.

Submodules are imported on demand (``prepare-data`` does not need torch).
"""
