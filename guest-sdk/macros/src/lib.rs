//! The attributes behind `#[cairn_sdk::service]`, `#[cairn_sdk::object]` and
//! `#[cairn_sdk::workflow]`.
//!
//! Each attribute goes on an inherent `impl` block whose associated
//! functions are the handlers: `fn name(ctx: &Context) -> HandlerResult<O>`
//! or `fn name(ctx: &Context, input: I) -> HandlerResult<O>`. It keeps the
//! block as written (minus the `#[shared]`/`#[exclusive]` markers) and adds
//! an implementation of `cairn_sdk::Service` that describes the handlers and
//! dispatches to them, so users never touch the WIT bindings.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{format_ident, quote};
use syn::{parse_macro_input, spanned::Spanned, ImplItem, ItemImpl, LitStr};

/// A stateless service: every handler runs independently.
#[proc_macro_attribute]
pub fn service(args: TokenStream, item: TokenStream) -> TokenStream {
    expand(Kind::Service, args, item)
}

/// A virtual object: keyed state; handlers are exclusive unless `#[shared]`.
#[proc_macro_attribute]
pub fn object(args: TokenStream, item: TokenStream) -> TokenStream {
    expand(Kind::Object, args, item)
}

/// A workflow: the `run` handler executes once per workflow id; the other
/// handlers are shared.
#[proc_macro_attribute]
pub fn workflow(args: TokenStream, item: TokenStream) -> TokenStream {
    expand(Kind::Workflow, args, item)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Service,
    Object,
    Workflow,
}

fn expand(kind: Kind, args: TokenStream, item: TokenStream) -> TokenStream {
    let mut block = parse_macro_input!(item as ItemImpl);
    let mut name: Option<LitStr> = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            name = Some(meta.value()?.parse()?);
            Ok(())
        } else {
            Err(meta.error("expected `name = \"ServiceName\"`"))
        }
    });
    parse_macro_input!(args with parser);
    match generate(kind, name, &mut block) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

struct Handler {
    ident: syn::Ident,
    kind: Tokens,
    takes_input: bool,
}

fn generate(kind: Kind, name: Option<LitStr>, block: &mut ItemImpl) -> syn::Result<Tokens> {
    let self_ty = &block.self_ty;
    let service_name = match name {
        Some(lit) => lit.value(),
        None => match &**self_ty {
            syn::Type::Path(p) => p.path.segments.last().expect("a path").ident.to_string(),
            other => return Err(syn::Error::new(other.span(), "expected a named type")),
        },
    };
    let handlers = block
        .items
        .iter_mut()
        .filter_map(|item| match item {
            ImplItem::Fn(f) => Some(handler(kind, f)),
            _ => None,
        })
        .collect::<syn::Result<Vec<_>>>()?;
    if handlers.is_empty() {
        return Err(syn::Error::new(
            block.span(),
            "a service needs at least one handler",
        ));
    }
    let service_kind = match kind {
        Kind::Service => quote!(::cairn_sdk::ServiceKind::Service),
        Kind::Object => quote!(::cairn_sdk::ServiceKind::VirtualObject),
        Kind::Workflow => quote!(::cairn_sdk::ServiceKind::Workflow),
    };
    let descriptors = handlers.iter().map(|h| {
        let name = h.ident.to_string();
        let kind = &h.kind;
        quote!((#name, #kind))
    });
    let arms = handlers.iter().map(|h| {
        let ident = &h.ident;
        let name = ident.to_string();
        let call = if h.takes_input {
            quote!(::cairn_sdk::__private::call_with_input(ctx, Self::#ident))
        } else {
            quote!(::cairn_sdk::__private::call_without_input(ctx, Self::#ident))
        };
        quote!(#name => ::core::option::Option::Some(#call),)
    });
    Ok(quote! {
        #block

        impl ::cairn_sdk::Service for #self_ty {
            const NAME: &'static str = #service_name;
            const KIND: ::cairn_sdk::ServiceKind = #service_kind;
            const HANDLERS: &'static [(&'static str, ::cairn_sdk::HandlerKind)] = &[#(#descriptors),*];

            fn invoke(
                handler: &str,
                ctx: &::cairn_sdk::Context,
            ) -> ::core::option::Option<::core::result::Result<::std::vec::Vec<u8>, ::cairn_sdk::HandlerError>> {
                match handler {
                    #(#arms)*
                    _ => ::core::option::Option::None,
                }
            }
        }
    })
}

/// Read one handler's signature and markers, removing the markers.
fn handler(kind: Kind, f: &mut syn::ImplItemFn) -> syn::Result<Handler> {
    let mut marker = None;
    let mut error = None;
    f.attrs.retain(|attr| {
        let found = ["shared", "exclusive"]
            .into_iter()
            .find(|m| attr.path().is_ident(m));
        if let Some(m) = found {
            if kind != Kind::Object {
                error = Some(syn::Error::new(
                    attr.span(),
                    format!("#[{m}] applies to virtual object handlers only"),
                ));
            }
            marker = Some(m);
        }
        found.is_none()
    });
    if let Some(e) = error {
        return Err(e);
    }
    let params = f.sig.inputs.len();
    if !(1..=2).contains(&params) || f.sig.receiver().is_some() {
        return Err(syn::Error::new(
            f.sig.span(),
            "a handler is `fn name(ctx: &Context)` or `fn name(ctx: &Context, input: T)`",
        ));
    }
    let ident = f.sig.ident.clone();
    let kind = match (kind, marker) {
        (Kind::Object, Some("shared")) => format_ident!("Shared"),
        (Kind::Workflow, _) if ident == "run" => format_ident!("Workflow"),
        (Kind::Workflow, _) => format_ident!("Shared"),
        _ => format_ident!("Exclusive"),
    };
    Ok(Handler {
        ident,
        kind: quote!(::cairn_sdk::HandlerKind::#kind),
        takes_input: params == 2,
    })
}
