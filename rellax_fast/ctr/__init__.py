"""The conventional CTR model of ReLLaX (DIN): the model and its training (``din``), the data glue, fitting,
the saved CTR folder and its reuse (``store``), and the ``train-ctr`` command (``cli``). It imports ``data``
and the leaf ``metrics``, never ``train`` or ``bench``."""
