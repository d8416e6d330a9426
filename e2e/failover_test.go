package e2e

import (
	"bufio"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/tessera-grid/tessera/internal/local"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// An executor killed in the middle of a greedy generation: the router finds
// a new route, rebuilds the KV caches by re-running the prefix, and the
// output equals the run without the failure.
func TestKillExecutorMidGeneration(t *testing.T) {
	g, base := startGrid(t, 3)
	body := `{"model":"stories260k","prompt":"Once upon a time","max_tokens":60,"temperature":0,"stream":true}`
	resp, err := http.Post(base+"/v1/completions", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("HTTP %d", resp.StatusCode)
	}
	var text strings.Builder
	chunks, killed := 0, false
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if line == "[DONE]" {
			break
		}
		var c wire.CompletionResponse
		if err := json.Unmarshal([]byte(line), &c); err != nil {
			t.Fatalf("bad chunk %q: %v", line, err)
		}
		if len(c.Choices) == 0 {
			t.Fatalf("error chunk: %s", line)
		}
		text.WriteString(c.Choices[0].Text)
		chunks++
		if chunks == 10 && !killed {
			// The middle stage dies: its connection closes at once.
			if err := g.Kill(local.ExecutorName(2)); err != nil {
				t.Fatal(err)
			}
			killed = true
		}
	}
	if !killed {
		t.Fatal("generation ended before the kill")
	}
	if text.String() != testmodel.GreedyText {
		t.Fatalf("after failover: %q\nwant %q", text.String(), testmodel.GreedyText)
	}
}
