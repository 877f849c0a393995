// Text imports (`with { type: "text" }`) that bun build embeds in the binary.
declare module "*.sql" {
  const text: string;
  export default text;
}
