"""The conversion engine: a checkpoint in Mistral's official or the Hugging Face layout -> the MLX format.

`source` opens and checks a checkpoint (a folder or a repo), `stream` converts it tensor by tensor through the
model family's weight map (`pixtral_mlx.models.<family>.weights`), `quantize` packs the language layers, `save`
writes the shards as they come, `output` locks the output folder and puts it in place atomically. The loader
uses it to convert an official repo once; the `convert` front end (`pixtral-mlx convert`,
`pixtral_mlx.convert.convert`) gives it its options.
"""
