"""Measuring tools, apart from the product: nothing that trains imports this package.

- `python -m qfsdp.bench run|report|prepare`: the benchmark matrix (`matrix`) and its report (`results`);
- `qfsdp.bench.stock`: the stock transformers + bitsandbytes + PEFT + TRL recipe, the baseline;
- `qfsdp.bench.flops`: FLOPs per token and GPU peak rates, the one MFU definition (also used by sweep reports).

Results, commands and versions: docs/BENCHMARKS.md.
"""
