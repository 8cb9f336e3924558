"""gaussad as an inspection service: `gaussad serve` answers each image over HTTP within milliseconds,
records every decision in an audit trail, and shows a review page.

The service is a thin shell over the library: scoring is `gaussad.scorer`'s, decisions are
`gaussad.decisions`'. Modules: `settings` (options), `decode` (request bytes to pixels), `runtime` (the
model interface; exported ONNX files), `torch_model` (model folders in PyTorch), `batching` (dynamic
batching), `service` (one inspection end to end), `audit` (the trail), `drift`, `metrics`, `kept` (kept
images), `payloads` (request bodies), `guard` (API keys, headers, request metrics), `app` (routes),
`commands` (`gaussad serve` and `gaussad history`), `loadgen` (loopback load for the benchmark and the
tests). Importing this package imports nothing heavy: the CLI's help answers at once.
"""
