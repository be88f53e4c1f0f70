"""What a model folder is, shared by lstmd.server, lstmd.client and lstmd.export; never torch.

- ``lstmd.model.folder``: the folder's files, its card (``model.json``) and their checks;
- ``lstmd.model.tokenizer``: the vocabulary and the word tokenizer;
- ``lstmd.model.graph``: the contract of ``model.onnx`` and the one function that runs it.

``folder`` and ``tokenizer`` are pure Python (the client uses the tokenizer); ``graph`` needs
numpy and onnxruntime, so it is imported on its own, never from here.
"""
