module github.com/tessera-grid/tessera/services/router

go 1.26.8
