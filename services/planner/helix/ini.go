package helix

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// iniFile is a Python configparser file: sections of key=value lines.
// Keys are lower-cased; lines before the first section go to section "".
type iniFile struct {
	order    []string
	sections map[string]map[string]string
}

func parseINI(r io.Reader, name string) (*iniFile, error) {
	f := &iniFile{sections: map[string]map[string]string{}}
	cur := ""
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<16), 1<<22)
	for line := 1; sc.Scan(); line++ {
		t := strings.TrimSpace(sc.Text())
		switch {
		case t == "" || strings.HasPrefix(t, "#") || strings.HasPrefix(t, ";"):
			continue
		case strings.HasPrefix(t, "["):
			if !strings.HasSuffix(t, "]") {
				return nil, fmt.Errorf("%w: %s:%d: bad section header %q", ErrSyntax, name, line, t)
			}
			cur = t[1 : len(t)-1]
			if _, dup := f.sections[cur]; dup {
				return nil, fmt.Errorf("%w: %s:%d: section [%s] appears twice", ErrSyntax, name, line, cur)
			}
			f.sections[cur] = map[string]string{}
			f.order = append(f.order, cur)
		default:
			k, v, ok := strings.Cut(t, "=")
			if !ok {
				return nil, fmt.Errorf("%w: %s:%d: want key=value, got %q", ErrSyntax, name, line, t)
			}
			if f.sections[cur] == nil {
				f.sections[cur] = map[string]string{}
			}
			f.sections[cur][strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return f, nil
}

// get returns a value or an error naming the missing section or key.
func (f *iniFile) get(section, key string) (string, error) {
	s, ok := f.sections[section]
	if !ok {
		return "", fmt.Errorf("%w: missing section [%s]", ErrSyntax, section)
	}
	v, ok := s[key]
	if !ok {
		return "", fmt.Errorf("%w: section [%s] has no key %q", ErrSyntax, section, key)
	}
	return v, nil
}

// unitFactor converts a Helix unit name to bytes, bytes/s or seconds.
func unitFactor(unit string) (float64, bool) {
	switch unit {
	case "Byte", "Sec":
		return 1, true
	case "kbps", "KB":
		return 1e3, true
	case "mbps", "MB":
		return 1e6, true
	case "gbps", "GB":
		return 1e9, true
	case "MilliSec":
		return 1e-3, true
	}
	return 0, false
}

// parseQuantity reads "<number> * <unit>" or a bare number.
func parseQuantity(s string) (float64, error) {
	num, unit, hasUnit := strings.Cut(s, "*")
	v, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
	if err != nil {
		return 0, fmt.Errorf("%w: number %q", ErrSyntax, s)
	}
	if !hasUnit {
		return v, nil
	}
	f, ok := unitFactor(strings.TrimSpace(unit))
	if !ok {
		return 0, fmt.Errorf("%w: unit in %q", ErrSyntax, s)
	}
	return v * f, nil
}

// parseList reads a Python list literal of numbers and single-quoted strings.
func parseList(s string) ([]any, error) {
	var out []any
	if err := json.Unmarshal([]byte(strings.ReplaceAll(s, "'", `"`)), &out); err != nil {
		return nil, fmt.Errorf("%w: list %q: %v", ErrSyntax, s, err)
	}
	return out, nil
}

// parseIntList reads a list that must hold only integers.
func parseIntList(s string) ([]int, error) {
	items, err := parseList(s)
	if err != nil {
		return nil, err
	}
	out := make([]int, 0, len(items))
	for _, it := range items {
		v, ok := it.(float64)
		if !ok || v != float64(int(v)) {
			return nil, fmt.Errorf("%w: list %q holds %v, want integers", ErrSyntax, s, it)
		}
		out = append(out, int(v))
	}
	return out, nil
}

// parseString strips the double quotes of a Python string literal, if any.
func parseString(s string) string {
	if len(s) >= 2 && s[0] == '"' && s[len(s)-1] == '"' {
		return s[1 : len(s)-1]
	}
	return s
}
