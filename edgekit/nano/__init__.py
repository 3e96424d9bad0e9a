"""v3-nano: the small trained DeepSeek-V3-family reference model shipped in ``edgekit/data/v3-nano``.

``corpus`` builds the offline text corpus (Python standard-library sources, split by file),
``tokenizer`` trains its byte-level BPE, ``train`` trains and saves the model, ``evaluate``
measures it on the held-out split against a unigram baseline.
"""
