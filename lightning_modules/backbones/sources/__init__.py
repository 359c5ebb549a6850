"""Backbone sources, one module per name prefix (`timm/...` is `sources/timm.py`), found by `backbone.source`.

A source module holds:

- `data_config(arch, weights, in_chans) -> DataConfig`: the preprocessing of the weights, without building;
- `build(arch, weights, data_config, **options) -> (body, stages)`: the network without its classifier (its
  output flattens to the features) and its stages from input to output, covering every parameter once;
- `cam_layer(body) -> CamLayer | None`: the module a class activation map looks at (the last spatial stage), None
  when the network has no spatial map (an MLP);
- `OPTIONS`: the keyword options `build` takes (such as `drop_path_rate`), refused for other sources;
- `EXAMPLE`: an architecture that builds offline with `weights: none` (the registry test builds every source's).
"""
