// Package caddyfile holds the Caddyfile parsing shared by the modules of
// caddy-layer4chain: a block walker that rejects unknown and duplicate
// options with the option's name and line, and small value parsers, so each
// option costs one line instead of fifteen. Its tests adapt every example
// Caddyfile and compare the result with a golden JSON.
package caddyfile

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// Option parses one option of a block. The dispenser is on the option's
// name; the option consumes its arguments (and a nested block, if it takes
// one).
type Option func(d *caddyfile.Dispenser) error

// ParseBlock walks the block that follows the current token, calling the
// option of each name. It rejects unknown options and, unless listed in
// repeatable, options given twice. directive names the block in errors.
func ParseBlock(d *caddyfile.Dispenser, directive string, options map[string]Option, repeatable ...string) error {
	seen := make(map[string]bool, len(options))
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		parse, ok := options[name]
		if !ok {
			return d.Errf("unknown %s option '%s'", directive, name)
		}
		if seen[name] && !contains(repeatable, name) {
			return d.Errf("duplicate %s option '%s'", directive, name)
		}
		seen[name] = true
		if err := parse(d); err != nil {
			return err
		}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// oneArg returns the option's single argument.
func oneArg(d *caddyfile.Dispenser) (string, error) {
	name := d.Val()
	if !d.NextArg() {
		return "", d.Errf("option '%s' needs a value", name)
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.Errf("option '%s' takes one value, got another: '%s'", name, d.Val())
	}
	return v, nil
}

// Duration parses an option with one duration argument ("5s", "1h", "2d").
// Negative durations are rejected.
func Duration(dst *caddy.Duration) Option {
	return func(d *caddyfile.Dispenser) error {
		name := d.Val()
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		dur, err := caddy.ParseDuration(v)
		if err != nil {
			return d.Errf("option '%s': invalid duration '%s': %v", name, v, err)
		}
		if dur < 0 {
			return d.Errf("option '%s': must not be negative, got '%s'", name, v)
		}
		*dst = caddy.Duration(dur)
		return nil
	}
}

// Int parses an option with one non-negative integer argument.
func Int(dst *int) Option {
	return func(d *caddyfile.Dispenser) error {
		name := d.Val()
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return d.Errf("option '%s': want a non-negative integer, got '%s'", name, v)
		}
		*dst = n
		return nil
	}
}

// OneOf parses an option with one argument from a fixed set.
func OneOf(dst *string, choices ...string) Option {
	return func(d *caddyfile.Dispenser) error {
		name := d.Val()
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		if !contains(choices, v) {
			return d.Errf("option '%s': unknown value '%s' (want one of %v)", name, v, choices)
		}
		*dst = v
		return nil
	}
}

// Strings parses an option with one or more arguments and appends them.
func Strings(dst *[]string) Option {
	return func(d *caddyfile.Dispenser) error {
		name := d.Val()
		args := d.RemainingArgs()
		if len(args) == 0 {
			return d.Errf("option '%s' needs at least one value", name)
		}
		*dst = append(*dst, args...)
		return nil
	}
}
