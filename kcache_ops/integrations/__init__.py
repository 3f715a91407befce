"""Bridges from kcache_ops to other libraries, each imported only when used.

* ``kcache_ops.integrations.transformers``: KCache inside Hugging Face transformers models (needs
  the optional extra, ``pip install kcache_ops[transformers]``).

Nothing here imports a third-party library; the requirement below is the package's one statement
of the tested range (setup.py reads it for the extra, the integration checks it at import; the
developers' requirements.txt repeats it, and a test checks that the two agree).
"""
TRANSFORMERS_REQUIREMENT = "transformers>=5.17,<6"
