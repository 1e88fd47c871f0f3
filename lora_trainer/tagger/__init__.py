"""WD14 auto-tagger (SmilingWolf's ONNX taggers) on onnxruntime (issue 4).

Entry points: `registry.resolve_model` (short name, Hub repo or local folder -> files),
`engine.Tagger` (session + labels + preprocessing), `thresholds.TagOptions` / `compose_caption`,
`folder.tag_folder` (captions beside images, report), `demo_model.write_demo_tagger`.
"""
