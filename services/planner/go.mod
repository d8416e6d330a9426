module github.com/tessera-grid/tessera/services/planner

go 1.26.8
