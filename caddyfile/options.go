// Package caddyfile holds the Caddyfile parsing shared by the modules of
// caddy-layer4chain: a block walker that rejects unknown and duplicate
// options with the option's name and line, and small value parsers, so each
// option costs one line instead of fifteen. Its tests adapt every example
// Caddyfile and compare the result with a golden JSON.
package caddyfile

import (
	"fmt"
	"strconv"
	"strings"

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

// Off is the value the word `off` adapts to: in the JSON config of every
// module of caddy-layer4chain, a negative value switches a limit off.
const Off = -1

// Duration parses an option with one duration argument ("5s", "1h", "2d").
// Negative durations are rejected.
func Duration(dst *caddy.Duration) Option { return duration(dst, false) }

// DurationOrOff is Duration for a limit that can be switched off: the word
// `off` stores Off.
func DurationOrOff(dst *caddy.Duration) Option { return duration(dst, true) }

func duration(dst *caddy.Duration, canBeOff bool) Option {
	return func(d *caddyfile.Dispenser) error {
		name := d.Val()
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		if canBeOff && v == "off" {
			*dst = Off
			return nil
		}
		dur, err := caddy.ParseDuration(v)
		if err != nil {
			hint := ""
			if _, numErr := strconv.ParseFloat(v, 64); numErr == nil {
				n := strings.TrimPrefix(v, "-")
				hint = fmt.Sprintf("; a duration has a unit, such as '%sms' or '%ss'", n, n)
				if canBeOff {
					hint += ", and 'off' switches it off"
				}
			}
			return d.Errf("option '%s': invalid duration '%s': %v%s", name, v, err, hint)
		}
		if dur < 0 {
			if canBeOff {
				return d.Errf("option '%s': must not be negative, got '%s'; 'off' switches it off", name, v)
			}
			return d.Errf("option '%s': must not be negative, got '%s'", name, v)
		}
		*dst = caddy.Duration(dur)
		return nil
	}
}

// Int parses an option with one non-negative integer argument.
func Int(dst *int) Option { return integer(dst, false) }

// IntOrOff is Int for a limit that can be switched off: the word `off`
// stores Off.
func IntOrOff(dst *int) Option { return integer(dst, true) }

func integer(dst *int, canBeOff bool) Option {
	return func(d *caddyfile.Dispenser) error {
		name := d.Val()
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		if canBeOff && v == "off" {
			*dst = Off
			return nil
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			if canBeOff {
				return d.Errf("option '%s': want a non-negative integer or 'off', got '%s'", name, v)
			}
			return d.Errf("option '%s': want a non-negative integer, got '%s'", name, v)
		}
		*dst = n
		return nil
	}
}

// Flag parses an option that takes no value: its presence stores true.
func Flag(dst *bool) Option {
	return func(d *caddyfile.Dispenser) error {
		name := d.Val()
		if d.NextArg() {
			return d.Errf("option '%s' takes no value, got '%s'", name, d.Val())
		}
		*dst = true
		return nil
	}
}

// Marking wraps the option parser opt so that it also stores true in set,
// for options whose mere presence switches something on (a Caddyfile
// health_* option switches active health checks on).
func Marking(set *bool, opt Option) Option {
	return func(d *caddyfile.Dispenser) error {
		*set = true
		return opt(d)
	}
}

// NotOff wraps the option parser opt of a limit that cannot be switched
// off, so that the word `off` is rejected with why instead of as a value of
// the wrong type.
func NotOff(why string, opt Option) Option {
	return func(d *caddyfile.Dispenser) error {
		name := d.Val()
		if d.NextArg() {
			off := d.Val() == "off"
			d.Prev()
			if off {
				return d.Errf("option '%s' cannot be off: %s", name, why)
			}
		}
		return opt(d)
	}
}

// Unsupported is the parser of an option that a similar module has (such
// as caddy-l4's proxy) and this one does not have yet: it fails with the
// option's name and instead, which says what to use meanwhile.
func Unsupported(instead string) Option {
	return func(d *caddyfile.Dispenser) error {
		return d.Errf("option '%s': %s", d.Val(), instead)
	}
}

// NoBlock fails if a block opens on the current line, with the option's
// name and why; it leaves the cursor where it was. For options that take
// arguments only, where a block is a likely habit from another module.
func NoBlock(d *caddyfile.Dispenser, why string) error {
	name, line := d.Val(), d.Line()
	steps := 0
	for d.NextArg() {
		steps++
	}
	brace := false
	if d.Next() {
		steps++
		brace = d.Val() == "{" && d.Line() == line
	}
	for ; steps > 0; steps-- {
		d.Prev()
	}
	if brace {
		return d.Errf("option '%s' takes no block: %s", name, why)
	}
	return nil
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

// Bytes parses an option with one or more values from 0 to 255, each in
// hex ("0x20") or decimal ("32"), and appends them. For TLV types, which
// the PROXY protocol spec writes in hex.
func Bytes(dst *[]int) Option {
	return func(d *caddyfile.Dispenser) error {
		name := d.Val()
		args := d.RemainingArgs()
		if len(args) == 0 {
			return d.Errf("option '%s' needs at least one value", name)
		}
		for _, a := range args {
			// Not base 0: a leading 0 would read as octal, 0b as binary.
			digits, base := a, 10
			if len(a) > 2 && (a[:2] == "0x" || a[:2] == "0X") {
				digits, base = a[2:], 16
			}
			n, err := strconv.ParseUint(digits, base, 8)
			if err != nil {
				return d.Errf("option '%s': want a value from 0 to 255, in hex (0x20) or decimal, got '%s'", name, a)
			}
			*dst = append(*dst, int(n))
		}
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
