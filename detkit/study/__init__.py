"""The reproduction study of the DCN papers, a package on top of the library that nothing in
detkit imports: ablation tables (`tables`), the sweep that trains every row for several seeds
(`sweep`) and its records (`records`), the report beside the papers' numbers (`report`) and
the papers' claims (`claims`), the cost of each experiment (`cost`), the eval-noise bootstrap
(`bootstrap`), the RoI-pooling probes (`probes`), the paper figures (`figures`), the offset
statistics (`offset_stats`) and their tools (`detkit.study.cli`, their config schemas in
`schemas`)."""
