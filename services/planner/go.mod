module github.com/tessera-grid/tessera/services/planner

go 1.26.8

require github.com/tessera-grid/tessera/pkg v0.0.0

replace github.com/tessera-grid/tessera/pkg => ../../pkg
