module github.com/tessera-grid/tessera/services/registry

go 1.26.8
