"""``scratchlm report`` and what it stands on: runs read (``runs``), the loss law (``law``) and its backtests
(``backtest``), the forecast (``forecast``), plots (``plots``), Markdown (``markdown``) and the command
(``command``)."""
