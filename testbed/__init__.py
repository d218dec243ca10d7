"""What tests and benchmarks share, owned by neither: real servers as child processes (`servers`), hostile
inputs (`hostile`) and the fuzzing strategies over every RPC (`fuzz`). Run from a checkout; not installed
with zspace (docs/architecture.md, "Layers")."""
