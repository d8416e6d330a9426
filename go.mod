module github.com/tessera-grid/tessera

go 1.26.8
