module github.com/tessera-grid/tessera/schemas

go 1.26.8
