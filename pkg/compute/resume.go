package compute

import "fmt"

// BeginAt is Begin for a pass that starts at layer (First <= layer <=
// End) instead of the stage's first layer: it continues a pass that ended
// early, on one node, after the trunk of layer-1, whose feed-forward
// experts ran elsewhere. Each item's Hidden is then the residual entering
// layer (layer-1's residual plus its experts' outputs), even on a stage
// with the embedding; its cache holds layer-1's and earlier layers' keys
// and values for the item's positions, which the paused pass wrote.
func (s *Stage) BeginAt(items []*Item, layer int) (*Pass, error) {
	if layer == s.First {
		return s.Begin(items)
	}
	if layer < s.First || layer > s.End {
		return nil, fmt.Errorf("%w: pass to begin at layer %d, outside the stage's [%d,%d]", ErrPassOrder, layer, s.First, s.End)
	}
	// The inputs are hidden states: load them as a stage without the
	// embedding does. The stage is not shared between goroutines.
	embed := s.Embed
	s.Embed = nil
	p, err := s.Begin(items)
	s.Embed = embed
	if err != nil {
		return nil, err
	}
	p.next = layer
	return p, nil
}
