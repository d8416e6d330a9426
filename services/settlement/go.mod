module github.com/tessera-grid/tessera/services/settlement

go 1.26.8
