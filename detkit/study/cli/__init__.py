"""The study's tools: `ablate`, `report`, `eval_noise`, `paper_figures`, `analyze_offsets`,
`probe_roi_pool`, each with a `main()` that tools/<tool>.py and the `detkit-<tool>` console
scripts call, built on `detkit.cli.run_app` like the library's tools."""
