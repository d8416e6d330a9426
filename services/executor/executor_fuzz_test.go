package executor

import (
	"strconv"
	"strings"
	"testing"
)

func TestParseBytesRefusesWhatIsNoSize(t *testing.T) {
	for _, s := range []string{"1e300TiB", "NaN", "+Inf", "-0.5GiB", "16EB", "x"} {
		if v, err := ParseBytes(s); err == nil {
			t.Errorf("%q gave %d", s, v)
		}
	}
	if v, err := ParseBytes("1.5GiB"); err != nil || v != 3<<29 {
		t.Errorf("1.5GiB: %d %v", v, err)
	}
}

// FuzzParseBytes: TESSERA_EXECUTOR_MEMORY_BUDGET comes from an operator's
// environment file; any text is refused or gives a size that a plain number
// of bytes reproduces.
func FuzzParseBytes(f *testing.F) {
	for _, s := range []string{"", "8GiB", "1.5GB", "512MiB", "100", "1e3KB", "-1GiB", "GiB", "1e300TiB", " 7 B "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseBytes(s)
		if err != nil {
			return
		}
		if strings.TrimSpace(s) == "" {
			if v != 0 {
				t.Fatalf("%q gave %d", s, v)
			}
			return
		}
		back, err := ParseBytes(strconv.FormatUint(v, 10))
		if err != nil || back != v {
			t.Fatalf("%q gave %d, which reads back as %d (%v)", s, v, back, err)
		}
	})
}
