//go:build !linux

package layer4chain

// parker is Linux-only: elsewhere directions never park.
type parker struct{}

func getParker() *parker                         { return nil }
func (pk *parker) arm(fd int, d *direction) bool { return false }
func (pk *parker) forget(d *direction)           {}
