// Package schemas embeds the JSON Schema (draft 2020-12) of every message
// that travels between Tessera's services, so that services can validate
// what they receive against the same documents that other-language clients
// read.
package schemas

import (
	"bytes"
	"embed"
	"fmt"
	"io/fs"
	"path"
	"strings"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

//go:embed *.json
var files embed.FS

// BaseURL is the $id prefix of every schema.
const BaseURL = "https://tessera.dev/schemas/"

// FS returns the schema files.
func FS() fs.FS { return files }

// Names lists the schemas by name (file name without .json).
func Names() []string {
	ents, _ := fs.ReadDir(files, ".")
	var out []string
	for _, e := range ents {
		out = append(out, strings.TrimSuffix(e.Name(), ".json"))
	}
	return out
}

// Set is a compiled set of schemas.
type Set struct {
	byName map[string]*jsonschema.Schema
}

// Compile compiles every embedded schema.
func Compile() (*Set, error) {
	c := jsonschema.NewCompiler()
	c.AssertFormat()
	c.AssertContent()
	names := Names()
	for _, n := range names {
		b, err := fs.ReadFile(files, n+".json")
		if err != nil {
			return nil, err
		}
		doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(b))
		if err != nil {
			return nil, fmt.Errorf("schema %s: %w", n, err)
		}
		if err := c.AddResource(BaseURL+path.Base(n)+".json", doc); err != nil {
			return nil, fmt.Errorf("schema %s: %w", n, err)
		}
	}
	s := &Set{byName: map[string]*jsonschema.Schema{}}
	for _, n := range names {
		sc, err := c.Compile(BaseURL + n + ".json")
		if err != nil {
			return nil, fmt.Errorf("schema %s: %w", n, err)
		}
		s.byName[n] = sc
	}
	return s, nil
}

// Validate checks the JSON document doc against the schema called name.
func (s *Set) Validate(name string, doc []byte) error {
	sc, ok := s.byName[name]
	if !ok {
		return fmt.Errorf("no schema called %q", name)
	}
	v, err := jsonschema.UnmarshalJSON(bytes.NewReader(doc))
	if err != nil {
		return fmt.Errorf("%s: not JSON: %w", name, err)
	}
	if err := sc.Validate(v); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}
