module github.com/tessera-grid/tessera/services/executor

go 1.26.8
