(module
  (import "ünïcödé" "名前" (func))
  (import "" "" (func))
  (import "m" "a b\tc" (global i64)))
