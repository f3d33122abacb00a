"""What `pixelmill bench` and `pixelmill bench-search` measure: throughput against its limits
(``throughput``), what watching costs (``dashboard``), and search over many embeddings
(``search``). The commands themselves are in ``pixelmill.cli.bench``."""
