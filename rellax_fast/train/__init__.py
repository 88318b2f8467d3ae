"""ReLLaX on top of a backbone: the model wrapper and read-out (``model``), the pipeline (``pipeline``), training
(``trainer``, ``checkpoint``), the shared options and context (``args``, ``context``), run folders (``runs``),
metrics files, tables and statistics (``metrics``, ``stats``), and the ``train`` / ``eval`` / ``demo`` commands
(``cli_*``, which only parse and print)."""
