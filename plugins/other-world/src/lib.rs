//! Test fixture: a valid component of a different world, to check that the
//! host refuses components that do not implement `orch:agent/agent`.

wit_bindgen::generate!({
    inline: r#"
        package test:other@0.1.0;

        interface clock {
            now: func() -> u64;
        }

        world calculator {
            import clock;
            export add: func(a: u32, b: u32) -> u32;
        }
    "#,
    world: "calculator",
});

struct Calculator;

impl Guest for Calculator {
    fn add(a: u32, b: u32) -> u32 {
        a.wrapping_add(b).wrapping_add(test::other::clock::now() as u32)
    }
}

export!(Calculator);
