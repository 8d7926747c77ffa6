"""Templates of the remote code that ``to-hf`` writes beside a model that no stock
``transformers`` class implements (see ``conversion/remote_code.py``).

Each ``modeling_*.py`` here is valid Python that imports the shared layers from this project
between the ``# <nanomoe-copied>`` markers; the generator replaces that block by the source of
those objects, so the exported file runs with only torch and transformers installed and its
math is the reference's own text.
"""
