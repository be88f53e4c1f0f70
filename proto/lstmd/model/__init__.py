"""What a model folder is, shared by lstmd.server, lstmd.client and lstmd.export; never torch.

- ``lstmd.model.folder``: the folder's files, its card (``model.json``) and their checks;
- ``lstmd.model.tokenizer``: the ``Tokenizer`` interface, the kinds over a ``vocab.txt`` (lstmd's
  word tokenizer among them) and the vocabulary;
- ``lstmd.model.library_tokenizers``: the ``hf`` and ``sentencepiece`` kinds, which import their
  libraries when such a model loads (never imported by the client);
- ``lstmd.model.graph``: the contract of ``model.onnx`` and the one function that runs it.

``folder`` and ``tokenizer`` are pure Python (the client uses the tokenizer); ``graph`` needs
numpy and onnxruntime, so it is imported on its own, never from here.
"""
