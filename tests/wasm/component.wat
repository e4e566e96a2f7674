(component
  (import "wasi:http/types@0.2.0" (instance))
  (import "wasi:cli/environment@0.2.0" (instance (export "get-environment" (func (result (list (tuple string string)))))))
  (import "log" (func (param "msg" string)))
  (import "t" (type (sub resource)))
  (import "cfg" (component))
  (import "m" (core module)))
