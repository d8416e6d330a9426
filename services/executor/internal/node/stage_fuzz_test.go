package node

import (
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// FuzzParseStage: a stage request's headers and frame come from the
// network; parseStage refuses them with an error or returns a job whose
// fields hold what the forward pass relies on.
func FuzzParseStage(f *testing.F) {
	f.Add("r1", "stories260k", "0", "0:3", "prefill", "", wire.AppendI32(nil, []int32{1, 403, 407}))
	f.Add("r1", "stories260k", "5", "3:5", "recompute", "all", wire.AppendF32(nil, 2, 4, []float32{1, 2, 3, 4, 5, 6, 7, 8}))
	f.Add("r1", "m", "1", "0:2", "decode", "", wire.AppendI32(nil, []int32{7}))
	f.Add("r.1", "m", "-1", "2:1", "n2:x", "", []byte{0xff})
	f.Fuzz(func(t *testing.T, request, model, pos, rng, phase, logits string, data []byte) {
		msg := nats.NewMsg("tessera.node.n1.stage")
		msg.Header.Set(wire.HdrRequest, request)
		msg.Header.Set(wire.HdrModel, model)
		msg.Header.Set(wire.HdrPos, pos)
		msg.Header.Set(wire.HdrRange, rng)
		msg.Header.Set(wire.HdrPhase, phase)
		msg.Header.Set(wire.HdrLogits, logits)
		msg.Data = data
		j, err := parseStage(msg)
		if err != nil {
			return
		}
		if j.rows <= 0 || j.pos < 0 || j.first < 0 || j.end <= j.first {
			t.Fatalf("accepted job with rows %d, pos %d, range [%d,%d)", j.rows, j.pos, j.first, j.end)
		}
		if (j.tokens == nil) == (j.hidden == nil) {
			t.Fatalf("accepted job with tokens %v and hidden %v", j.tokens != nil, j.hidden != nil)
		}
		if j.phase != wire.PhasePrefill && j.phase != wire.PhaseDecode && j.phase != wire.PhaseRecompute {
			t.Fatalf("accepted phase %q", j.phase)
		}
		if j.tokens != nil && len(j.tokens) != j.rows {
			t.Fatalf("%d tokens for %d rows", len(j.tokens), j.rows)
		}
		if j.hidden != nil && len(j.hidden)%j.rows != 0 {
			t.Fatalf("%d hidden values for %d rows", len(j.hidden), j.rows)
		}
	})
}
