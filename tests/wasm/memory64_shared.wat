(module
  (import "env" "mem64" (memory i64 1 2))
  (import "env" "shared" (memory 1 2 shared))
  (func (export "_start")))
